from balancekv.cli import main

raise SystemExit(main())
