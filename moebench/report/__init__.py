"""What people look at: the report page of an evaluation and the leaderboard of every team."""
