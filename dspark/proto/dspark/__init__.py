"""Proto root for the `dspark.v1` protobuf package; generated code lives in v1/."""
