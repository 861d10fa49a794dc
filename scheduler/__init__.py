"""The tier scheduler: durable background jobs that move memory between tiers.

Flat modules (see docs/scheduler.md):

* :mod:`~memosd.scheduler.jobs` - the job record and its pure state machine;
* :mod:`~memosd.scheduler.runner` - :class:`JobRunner`, which executes jobs;
* :mod:`~memosd.scheduler.policy` - the :class:`TierPolicy` plugin protocol;
* :mod:`~memosd.scheduler.driver` - :class:`TierScheduler`, which asks policies for jobs;
* :mod:`~memosd.scheduler.tiers` - pure decisions of the built-in plaintext tiers;
* :mod:`~memosd.scheduler.consolidate` - fact consolidators (extractive, OpenAI-compatible);
* :mod:`~memosd.scheduler.policies_builtin` - the built-in plaintext tier policy.

Import the modules; this package re-exports nothing, so importing
``memosd.scheduler.jobs`` (which the store needs) stays cheap.
"""
