"""tools/export_hf.py's command line, run in the test process (no interpreter start-up per call)."""

import importlib.util
import os

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "export_hf.py")


def export_cli(*argv):
    """Run tools/export_hf.py with `argv`; its exit message, or None when it succeeded."""
    spec = importlib.util.spec_from_file_location("export_hf_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    try:
        tool.main(list(argv))
    except SystemExit as stop:
        return str(stop.code)
    return None
