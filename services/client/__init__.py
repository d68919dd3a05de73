"""The client side of the mesh: one MeshClient per caller, the requests it sends, and how a run is shown."""
