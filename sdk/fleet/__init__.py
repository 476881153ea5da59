"""Fleet provisioning and operations: ``fedge fleet init`` from one topology file, day-2 changes to one device,
running one host's share, and the fleet's verified status (docs/fleet.md)."""
