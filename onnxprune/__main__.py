import sys

try:  # a Ctrl-C while the heavy modules load is still an interrupt, not a traceback
    from .cli import main
except KeyboardInterrupt:
    print("onnxprune: interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
