"""Scale-out engines for batch runs (Ray). Import the engine module you need, e.g.
``from echo_agent.scale.ray_engine import run_batch_ray``; Ray itself is imported only when a run starts."""
