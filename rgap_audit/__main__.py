from rgap_audit.cli import main

raise SystemExit(main())
