"""Gaussian diffusion as pure functions: schedules, forward process, losses and samplers."""

from .schedule import (
    Schedule as Schedule,
    beta_schedule as beta_schedule,
    make_schedule as make_schedule,
    schedule_from_betas as schedule_from_betas,
    space_timesteps as space_timesteps,
)
