"""groupshot stage 3: score every face against its subject and write the report."""
