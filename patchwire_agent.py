"""patchwire-agent: skeleton (being written)."""
import sys
import patchwire
__version__ = patchwire.__version__
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print("patchwire-agent " + __version__)
        return 0
    return 0
if __name__ == "__main__":
    sys.exit(main())
