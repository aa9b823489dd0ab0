"""Run orchestration: an experiment (flags or YAML) is planned into run specs, scheduled inline
or on Ray, each run executed by the runner, its results recorded to the store."""
