from netisolate.cli import main

raise SystemExit(main())
