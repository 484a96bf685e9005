"""Tools around the scheduler, not part of the serving image: the single-server simulator
on a virtual clock, the cluster simulator with its autoscaler model, and the live load
generator. They import ``server.scheduling``; production server code never imports them."""
