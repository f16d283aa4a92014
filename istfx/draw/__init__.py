"""Drawing: the captured graph coloured by split group, as SVG."""
