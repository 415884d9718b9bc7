"""The validating admission webhook: the checks of `netisolate check`, served over TLS."""
