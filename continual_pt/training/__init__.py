"""One training phase: set-up of a session (data, model, engine, start mode) and the step loop."""
