"""Values everything may use: errors, the contract's types, settings, names, typed records, logs."""
