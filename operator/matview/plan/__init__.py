"""Apply: catalog facts, the pure planner, the executor (every lock, the one busy error), ownership markers."""
