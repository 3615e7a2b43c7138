"""`tree`: nodes relay stripes of chunks down interior-disjoint trees (`method`);
`peer` is the framed stream of chunks a node serves its children."""
