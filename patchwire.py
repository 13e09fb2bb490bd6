"""patchwire: skeleton (being written)."""
import sys
__version__ = "0.3.0"
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print("patchwire " + __version__)
        return 0
    return 0
if __name__ == "__main__":
    sys.exit(main())
