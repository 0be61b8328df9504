"""The composite checkout: fan out to steps, decide, commit or compensate."""
