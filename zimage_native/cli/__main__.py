"""python -m zimage_native.cli == the zimage command."""

from . import main

main()
