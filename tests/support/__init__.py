"""Helpers shared by the tests (no tests here): the services they run on (``services``, and ``faults`` for
private ones a test may break), test processors and worker processes (``procs``, ``worker_main``), the
JobManagerConfig they use (``config``), an in-memory query layer (``memory``, for the engine's decisions
without PostgreSQL), helpers of one feature used by tests of several (``client``,
``dispatch``, ``prefect_server``, ``cli``), simulated hosts (``netns``, ``cluster``) and the apps that test
subprocesses import (``intake_app``, ``mh_app``)."""
