"""One module per `netisolate` sub-command; each exposes `register(subparsers)`."""
