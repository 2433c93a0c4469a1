"""The Python API: the system's verbs spoken in DSPy (``dspyrt.connect``, ``dspyrt.connect_sync``), a deployed
program as a ``dspy.Module`` (``RemoteProgram``), and the declarative spec of a ``dspy.Signature`` class
(``program_spec``). Everything here is re-exported from ``dspyrt``."""
