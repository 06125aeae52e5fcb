from sniff.cli import main

raise SystemExit(main())
