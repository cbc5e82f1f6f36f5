from fasteval.cli import main

raise SystemExit(main())
