"""corpus: acquisition, cleaning and deduplication of text into Parquet shards with a manifest."""
