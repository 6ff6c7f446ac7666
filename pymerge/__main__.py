from pymerge.cli import main

raise SystemExit(main())
