"""On-disk and in-prompt data formats: protobuf shards, transcript cleaning, the prompt layout."""
