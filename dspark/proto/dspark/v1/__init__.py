"""Generated gRPC/protobuf code for the dspark.v1 protocol (see *.proto)."""
