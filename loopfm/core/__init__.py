"""What every stage shares: the run's config (`config`), its directory and lock (`rundir`),
atomic writes (`files`), time units (`timeunits`), the point-in-time rule of every history
(`sequences`), how a stage spreads its work (`engine`), what FM and VM training share
(`training`) and child processes that die with their starter (`children`)."""
