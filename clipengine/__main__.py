from clipengine.cli import main

main()
