"""A Python environment holding exactly some distributions, made of links to this environment's installed files
(no install, no network): put the folder on `sys.path`, or name it in a `.pth` file of a fresh venv."""

import importlib.metadata
import os


def link_distributions(folder, names) -> set[str]:
    """Link the top-level files and folders of each installed distribution in `names` into `folder` (made here);
    the names found. Names not installed are skipped: a dependency this platform does not install, such as the
    CUDA wheels of torch's CPU build."""
    os.makedirs(folder)
    found = set()
    for name in names:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.add(name)
        tops = {f.parts[0] for f in distribution.files or [] if f.parts[0] != ".." and not f.parts[0].endswith(".pth")}
        for top in tops:
            source, link = distribution.locate_file(top), os.path.join(folder, top)
            if os.path.exists(source) and not os.path.exists(link):
                os.symlink(source, link)
    return found
