"""Settings for the tests' JAX subprocesses (CLI runs on tiny configs)."""

# On tiny configs compiling dominates a run: XLA's cheap CPU settings cut a Meta-DMoE tiny
# run's CPU time by about a third (72 -> 47 s), more than its slower steps cost. Every run
# compared with another one uses the same flags, so they compile the same programs.
CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
  """`XLA_FLAGS` for a subprocess on `devices` fake CPU devices, compiling cheaply."""
  return f"--xla_force_host_platform_device_count={devices} {CHEAP_COMPILE}"
