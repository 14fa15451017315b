from dmuserd.daemon.cli import main

raise SystemExit(main())
