from meter_gateway.cli import main

raise SystemExit(main())
