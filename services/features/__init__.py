"""features: fits scaling, polynomial expansion and selection on the train split."""
