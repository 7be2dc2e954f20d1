from megastream.cli import main

raise SystemExit(main())
