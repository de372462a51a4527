"""A run's directory: its plan, what it writes, the state it resumes from, its bookkeeping."""
