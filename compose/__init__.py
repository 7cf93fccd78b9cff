"""groupshot stage 2: compose group photos where every person keeps their own face."""
