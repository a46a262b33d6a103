"""Files from elsewhere: checkpoint fetch (hf/https/s3/file) and S3 storage."""
