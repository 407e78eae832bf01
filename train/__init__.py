"""The trainer: shards streamed into MegActor with Ray Train."""
