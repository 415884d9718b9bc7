"""The node agent: watch this node's pods, find their network namespaces, enforce, repair, report."""
