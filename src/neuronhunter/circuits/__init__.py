"""Groups of units: sparse dictionaries (features), neuron clusters and automated circuit discovery."""
