"""Wire contracts of edgefl: protobuf sources, generated stubs and the one serde module."""
