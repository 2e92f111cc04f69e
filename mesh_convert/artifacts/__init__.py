"""What mesh-convert writes, whichever command writes it (convert, init, train's export, merge,
inspect, diagnose) and what push publishes: output folders written whole or not at all
(`output`), the record of a model's making, `conversion.json` (`record`), the model card
(`card`, from `templates/`), and the rule that no remote code but our own two files goes into
any of them (`remote_code`)."""
