"""The chained CNI plugin's side of the agent, as pure functions: the wire format between the
plugin (`cni/netisolate-cni.c`) and the agent, and the editing of the node's conflist. The I/O
(the socket, the files) lives in `netisolate.agent.cni_*`."""
