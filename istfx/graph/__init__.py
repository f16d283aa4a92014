"""The graph-data side of GIST: validated graphs, METIS clusters, Cluster-GCN batches, dataset readers."""
