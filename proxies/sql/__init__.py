"""What MySQL and PostgreSQL share: the statement event, statement analysis
(operation, tables, normalised shape), the sqlcommenter tag, the stats section."""
