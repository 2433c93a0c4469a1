"""The optimization loop (the guide's FourPartOptimizationLoop): create → evaluate → optimize → deploy."""
